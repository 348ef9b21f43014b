"""The compiler: TVM Relax from the (static, possibly QDQ) ONNX model to a library for the profile's target.

The only package that imports tvm (an import-linter contract, `make test`): `build` (import, rewrite, tune, build,
manifest), `passes/` (the Relax rewrites: integer kernels, dot-product layouts, channel-last, Winograd, fast math,
and their shared helpers) and `tuning/` (MetaSchedule's budget and turns, forked builds, the tuning curve, tensor
intrinsics, timing candidates on a board). Everything in it is part of the artifact cache key
(`build.COMPILE_REVISION`).
"""
