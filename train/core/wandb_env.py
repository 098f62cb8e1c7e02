"""What wandb would find in this environment, read without importing wandb or reaching the network:
whether it has credentials (the logger's `mode: auto` and the analysis's attaching to a run go
online only then)."""
from __future__ import annotations

import netrc
import os
import re


def wandb_credentials_present() -> bool:
    """True when wandb would find an API key (environment or netrc), without any network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    for path in (os.environ.get("NETRC"), os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")):
        if path and os.path.isfile(path):
            try:
                if netrc.netrc(path).authenticators(host):
                    return True
            except (netrc.NetrcParseError, OSError):
                continue
    return False
