"""The conditioning record: slicing, CFG, files of prompt embeddings, calibration on embedding-conditioned models,
and plain class labels unchanged."""

import pytest
import torch

from diffpro_cli.errors import InputError, UsageError
from diffpro_cli.models.base import DiffusionModel, linear_alphas_cumprod
from diffpro_cli.models.conditioning import Conditioning, as_conditioning, conditioning_from_tensors, load_conditioning
from diffpro_cli.sampling import SamplerConfig, default_labels, guided_eps, sample, uniform_timesteps


class TinyText(torch.nn.Module):
    """A tiny noise predictor conditioned on token embeddings [B, L, 6] and a pooled vector [B, 4]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.ctx = torch.nn.Linear(6, 1)
        self.pool = torch.nn.Linear(4, 1)
        self.temb = torch.nn.Linear(1, 1)

    def forward(self, x, t, ctx, pooled):
        h = self.conv(x) + self.temb(t.float().view(-1, 1) / 1000).view(-1, 1, 1, 1)
        h = h + self.ctx(ctx).mean(1).view(-1, 1, 1, 1) + self.pool(pooled).view(-1, 1, 1, 1)
        return torch.tanh(h)


def text_model():
    return DiffusionModel(spec="test:text", net=TinyText().eval(), kind="custom", sample_shape=(1, 8, 8),
                          alphas_cumprod=linear_alphas_cumprod(),
                          forward_fn=lambda net, x, t, c: net(x, t, c.encoder_hidden_states, c.pooled_projections),
                          conditioning="embeddings",
                          conditioning_fields={"encoder_hidden_states": [None, 6], "pooled_projections": [4]})


def prompts(m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(m, 5, 6, generator=g), "pooled_prompt_embeds": torch.randn(m, 4, generator=g),
            "negative_prompt_embeds": torch.zeros(1, 5, 6), "negative_pooled_prompt_embeds": torch.zeros(1, 4)}


def test_slicing_cycling_and_cat_keep_rows_together():
    c = conditioning_from_tensors(prompts(3))
    assert len(c) == 3 and len(c.uncond) == 3            # a single negative row is broadcast
    cyc = c.cycle(7)
    assert [int(i) for i in (cyc.encoder_hidden_states[:, 0, 0] == c.encoder_hidden_states[[0, 1, 2, 0, 1, 2, 0], 0, 0]).long()] == [1] * 7
    part = cyc.take(2, 3)
    assert torch.equal(part.pooled_projections, c.pooled_projections[[2, 0, 1]])
    assert torch.equal(part.uncond.encoder_hidden_states, torch.zeros(3, 5, 6))
    assert torch.equal(cyc.batch([4, 0]).encoder_hidden_states, c.encoder_hidden_states[[1, 0]])
    both = Conditioning.cat([part, part.unconditional()])
    assert len(both) == 6 and both.uncond is None
    assert as_conditioning(torch.tensor([1, 2])).class_labels.tolist() == [1, 2] and as_conditioning(None) is None


def test_embedding_model_sampling_is_batch_independent_and_cfg_uses_the_negative_embeddings():
    model = text_model().with_conditioning(conditioning_from_tensors(prompts(3)))
    ts = uniform_timesteps(1000, 6)
    cfg = SamplerConfig(cfg_scale=3.0)
    big = sample(model, 5, ts, cfg, seed=1, batch_size=5)
    small = sample(model, 5, ts, cfg, seed=1, batch_size=2)
    assert torch.allclose(big, small, atol=1e-6)
    # explicit conditioning == the default cycled set
    assert torch.allclose(sample(model, 5, ts, cfg, labels=model.conditioning_set.cycle(5), seed=1), big, atol=1e-6)
    # guidance: uncond + s (cond - uncond), uncond from the negative embeddings
    c = model.conditioning_set.take(0, 2)
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 400)
    with torch.no_grad():
        cond, unc = model.eps(x, t, c), model.eps(x, t, c.uncond)
        assert torch.allclose(guided_eps(model, x, 400, c, 3.0), unc + 3.0 * (cond - unc), atol=1e-6)
    # different prompts give different samples
    assert not torch.allclose(big[0], big[1])


def test_embedding_model_needs_embeddings_and_cfg_needs_negatives():
    model = text_model()
    with pytest.raises(UsageError, match="--conditioning"):
        default_labels(model, 2)
    with pytest.raises(UsageError, match="--conditioning"):
        model.eps(torch.zeros(1, 1, 8, 8), torch.tensor([3]), None)
    plain = {k: v for k, v in prompts(2).items() if not k.startswith("negative_")}
    model.with_conditioning(conditioning_from_tensors(plain))
    with pytest.raises(UsageError, match="unconditional embeddings"):
        sample(model, 1, [10, 500], SamplerConfig(cfg_scale=2.0), seed=0)
    assert sample(model, 1, [10, 500], SamplerConfig(cfg_scale=1.0), seed=0).shape == (1, 1, 8, 8)


def test_conditioning_file_round_trip_and_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "embeds.safetensors"
    save_file(prompts(4), path)
    c = load_conditioning(path)
    assert c.encoder_hidden_states.shape == (4, 5, 6) and c.uncond.pooled_projections.shape == (4, 4)
    pt = tmp_path / "embeds.pt"
    torch.save(prompts(4), pt)
    assert torch.equal(load_conditioning(pt).encoder_hidden_states, c.encoder_hidden_states)
    bad = tmp_path / "bad.safetensors"
    save_file({"prompt_embeds": torch.zeros(3, 5, 6), "pooled_prompt_embeds": torch.zeros(2, 4)}, bad)
    with pytest.raises(InputError, match="disagree on the number of prompts"):
        load_conditioning(bad)
    save_file({"prompt_embedz": torch.zeros(3, 5, 6)}, bad)
    with pytest.raises(InputError, match="unknown entry 'prompt_embedz'"):
        load_conditioning(bad)
    save_file({"prompt_embeds": torch.zeros(3, 5, 7), "pooled_prompt_embeds": torch.zeros(3, 4)}, bad)
    with pytest.raises(InputError, match=r"trailing shape \[5, 7\] but the model expects \[None, 6\]"):
        text_model().with_conditioning(bad)
    save_file({"prompt_embeds": torch.zeros(3, 5, 6)}, bad)
    with pytest.raises(InputError, match="needs pooled_projections"):
        text_model().with_conditioning(bad)
    with pytest.raises(InputError, match=r"\.safetensors or \.pt"):
        load_conditioning(tmp_path / "embeds.npy")


def test_class_labels_as_tensor_or_conditioning_give_identical_samples(tiny_model):
    ts = uniform_timesteps(1000, 8)
    y = torch.tensor([3, 9, 0])
    cfg = SamplerConfig(cfg_scale=2.5)
    a = sample(tiny_model, 3, ts, cfg, labels=y, seed=5)
    b = sample(tiny_model, 3, ts, cfg, labels=Conditioning(class_labels=y), seed=5)
    assert torch.equal(a, b)
    # a class-label conditioning set replaces the default i % classes
    tiny_model.with_conditioning(Conditioning(class_labels=torch.tensor([3, 9, 0])))
    assert default_labels(tiny_model, 5).tolist() == [3, 9, 0, 3, 9]
    with pytest.raises(InputError, match="0..9"):
        tiny_model.with_conditioning(Conditioning(class_labels=torch.tensor([10])))


def test_profile_and_prune_calibrate_an_embedding_model_on_its_conditioning_set(tmp_path):
    from diffpro_cli.stages.profile import ProfileConfig, collect
    from diffpro_cli.stages.prune import PruneConfig, select_timesteps

    model = text_model().with_conditioning(conditioning_from_tensors(prompts(3)))
    prof, ts = collect(model, ProfileConfig(samples=4, batch=2, timesteps="999:0:250"))
    assert ts == [249, 499, 749, 999] and prof.samples_seen == 4 * len(ts)
    out = select_timesteps(model, PruneConfig(steps=4, n=3, batch=2, reference_steps=40, candidates=12))
    assert len(out["timesteps"]) == 4 and out["teacher"]["labels"] == "i % M of the conditioning set"
    assert out["drift"] <= out["uniform_drift"] + 1e-12
