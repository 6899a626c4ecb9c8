"""Flower ServerApp: the consortium coordinator's side of a run.

Module import stays light; the round loop lives in `fedrad.server.rounds`. With run-config `publish-dir` set,
the latest published release is first offered to every connected site (`fedrad.server.publish`); a
`publish-only` run (`fedrad publish`) does only that, for `publish-linger` seconds.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedrad.common.log_format import configure
    from fedrad.common.run_config import RunConfig

    configure(level=None)  # ISO times in the coordinator's log and `fedrad log` (fedrad.common.log_format)

    cfg = RunConfig.from_flower(dict(context.run_config))
    if cfg.publish_dir:
        from pathlib import Path

        from fedrad.server.publish import publish

        publish(grid, Path(cfg.publish_dir), cfg.publish_linger if cfg.publish_only else 0.0, context.run_id)
        if cfg.publish_only:
            return
    from fedrad.server.rounds import run_federation

    run_federation(grid, context)
