"""`python -m modalkv ...`, which is what `torchrun -m modalkv` and `accelerate launch -m modalkv` start."""

from modalkv.cli import app

app()
