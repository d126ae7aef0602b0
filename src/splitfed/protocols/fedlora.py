"""Plain federated LoRA: every device trains the whole model, adapters averaged each round
(adapter bytes counted both ways). The reference that split protocols save device memory against."""

from __future__ import annotations

from splitfed.protocols.local import LocalProtocol
from splitfed.registry import register


@register
class FederatedLoRA(LocalProtocol):
    name = "fedlora"
