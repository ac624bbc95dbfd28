"""`mlx_vlm.server` as shipped, with the CPU bf16 expert-matmul shim of cpu_compat applied.
Same arguments as `python -m mlx_vlm.server`."""
import cpu_compat  # noqa: F401
from mlx_vlm.server.cli import main

if __name__ == "__main__":
    main()
