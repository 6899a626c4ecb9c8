"""The coordinator names sites by what the operator enrolled them as (Flower's node name), never by what a
site says; a SuperLink that cannot answer leaves the node ids."""

from __future__ import annotations

from flwr.proto.node_pb2 import NodeInfo

from fedrad.server.site_names import SiteNames


class _Grid:
    """Only what SiteNames calls: Flower's `Grid.get_nodes()`, returning NodeInfo protos (or failing)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_nodes(self):
        if isinstance(self.nodes, Exception):
            raise self.nodes
        return self.nodes


def test_names_from_enrolment_and_node_ids_for_the_rest():
    grid = _Grid([NodeInfo(node_id=8141923344119028735, name="site-a"), NodeInfo(node_id=42)])
    names = SiteNames(grid)
    assert names.refresh() == {"8141923344119028735": "site-a"}
    assert names.label(8141923344119028735) == "site-a" and names.label("42") == "node 42"
    assert names.of(["8141923344119028735", "42"]) == {"8141923344119028735": "site-a"}
    grid.nodes = ConnectionError("SuperLink gone")
    assert names.refresh() == {"8141923344119028735": "site-a"}  # known names are kept
