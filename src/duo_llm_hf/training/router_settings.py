"""The paper's three router settings (its Fig. 7 and Appendix A), a preset of the router training.

Each setting (``router_settings.json``, shipped with the package) names the choices the routers pick from
(``route_options``) and the target usage of each choice: the fraction of the (token, layer) pairs the usage loss
steers it to. With two choices one target is enough (the other is its complement), as in the paper's budget loss.
`duo-llm train-router --setting` offers these names; this module reads only JSON, so that ``--help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path

ROUTER_SETTINGS_FILE = Path(__file__).with_name("router_settings.json")
ROUTER_SETTINGS: dict[str, dict] = json.loads(ROUTER_SETTINGS_FILE.read_text())

__all__ = ["ROUTER_SETTINGS", "ROUTER_SETTINGS_FILE"]
