"""Flower ServerApp: the consortium coordinator's side of a run.

Module import stays light; the round loop lives in `fedrad.server.rounds`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedrad.server.rounds import run_federation

    run_federation(grid, context)
