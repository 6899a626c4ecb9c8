"""`python -m fedrad.deploy.runtime_entry MODE ...`: the site runtime's process entry
(fedrad.client.runtime.site_runtime).

`fedrad node` starts it in serve mode and the runtime starts its workers and tasks the same way; the command
line is parsed by the fedrad shell (fedrad.deploy.cli.parse_runtime_args), the work is client code.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from fedrad.client.runtime.site_runtime import run_runtime
    from fedrad.deploy.cli import parse_runtime_args

    return run_runtime(parse_runtime_args(argv))


if __name__ == "__main__":
    sys.exit(main())
