"""The compiler: TVM Relax from the (static, possibly QDQ) ONNX model to a library for the profile's target.

The only package that imports tvm (an import-linter contract, `make test`): `frontend` (the target, the ONNX import
and the passes as one Sequential), `build` (build or tune, export, manifest), `intrinsics` (tensor intrinsics),
`passes/` (the Relax rewrites: integer kernels, dot-product layouts, channel-last, Winograd, fast math,
and their shared helpers) and `tuning/` (MetaSchedule's budget and turns, the search, forked builds, the tuning
curve, timing candidates on a board). Everything in it is part of the artifact cache key
(`build.COMPILE_REVISION`).
"""
