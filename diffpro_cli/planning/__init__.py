"""Planning library: options, error models, the measured cost table, solvers and the joint steps x bits plan."""
