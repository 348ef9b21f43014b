"""Rewrites of the Relax module before it is built: integer kernels for QDQ models (`int8`), 8-bit dot-product
layouts for VNNI and ARM sdot (`dot`), channel-last convs for CPUs (`layout`), Winograd 3x3 convs (`winograd`),
cheaper math (`fastmath`), and what they share (`relax_util`)."""
