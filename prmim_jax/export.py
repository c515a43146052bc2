"""``python -m prmim_jax.export``: the export tool (``prmim_jax.tools.export``), under a short name."""

from prmim_jax.tools import export

if __name__ == "__main__":
    export.main()
