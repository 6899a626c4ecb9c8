"""Site names on the coordinator, instead of Flower's 19-digit node ids.

The names are the ones the operator gave each site's key at enrolment (`fedrad certs register` passes the
site's folder name to `flwr supernode register --name`); the SuperLink reports them to the ServerApp with
each node (`grid.get_nodes()`). Nothing comes from the sites: only numbers cross the wire, and a site cannot
claim another's name. Nodes enrolled without a name (no node authentication: local runs) keep their id.
"""

from __future__ import annotations

from logging import WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid


class SiteNames:
    """node id (str) -> enrolled site name, refreshed from the SuperLink once per round (sites join late)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.names: dict[str, str] = {}
        self._warned = False

    def refresh(self) -> dict[str, str]:
        """Ask the SuperLink for its nodes; a failure keeps the names known so far (names are cosmetic)."""
        try:
            nodes = list(self.grid.get_nodes())
        except Exception as exc:  # noqa: BLE001 - a name lookup must never stop a round
            if not self._warned:
                log(WARNING, "fedrad: cannot read site names from the SuperLink (%s); showing node ids",
                    type(exc).__name__)
                self._warned = True
            return self.names
        for node in nodes:
            name = str(getattr(node, "name", "") or "").strip()
            if name:
                self.names[str(node.node_id)] = name
        return self.names

    def label(self, node: int | str) -> str:
        """The site's name, else "node <id>" (what `flwr supernode ls` lists)."""
        return self.names.get(str(node)) or f"node {node}"

    def of(self, nodes) -> dict[str, str]:
        """The known names of `nodes` (for a round's metrics line)."""
        return {str(n): self.names[str(n)] for n in nodes if str(n) in self.names}


__all__ = ["SiteNames"]
