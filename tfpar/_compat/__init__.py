"""Every private TensorFlow and Keras internal tfpar relies on, and why.

None of these has a public path in the supported TensorFlow and Keras
(`SUPPORTED` below, the same range as `pyproject.toml`). They live only in
this package, one module per area of tfpar, each module's docstring saying
which internals it uses and why:

- `callbacks`: graph collection for op placement, GPU bus ids, the
  profiler's XPlane protos (the callbacks).
- `cluster`: leaving a cluster (`tfpar.LocalCluster`), the coordinator's
  worker threads.
- `datasets`: the per-device iterators of a distributed dataset (the
  mirrored and pipeline strategies).
- `keras_callers`: which Keras model called into a strategy.
- `mirrored`: the cross-device ops hooks and reductions of
  `tfpar.MirroredStrategy` and `tfpar.MultiWorkerMirroredStrategy`.
- `parameter_server`: the coordinator's internals used by
  `tfpar.ParameterServerStrategy`.
- `pipeline`: the one-device extended object under `tfpar.PipelineStrategy`.
- `sharding`: sharded variables in Keras layers (parameter servers).

Nothing imports this package's modules but the part of tfpar that needs
them, so an internal that an upgrade removed breaks that strategy or
callback alone (`tfpar.__getattr__` turns the failed import into an error
that names the versions), and `import tfpar` still works.
`tests/_compat/` checks every internal and names the TensorFlow and
Keras versions when one changed.
"""

# The TensorFlow and Keras releases whose internals tests/_compat/
# checks; pyproject.toml declares the same range.
SUPPORTED = {"tensorflow": ">=2.21,<2.22", "keras": ">=3.15,<3.16"}
