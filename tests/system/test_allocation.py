"""A plan's subchannel owners and powers: validated in the config, used by the clock."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitfed.config import ConfigError, parse_config
from splitfed.registry import protocol_class
from splitfed.system.clock import Clock
from splitfed.system.costs import layer_costs
from splitfed.system.traffic import adapter_message_bytes, step_bytes
from splitfed.wire.messages import Message, encode
from tests.conftest import TINY_CONFIGS

BASE = {"protocol": "sfl", "devices": {"count": 2, "cuts": [1]}}


def _config(**system):
    return parse_config({**BASE, "system": system})


@pytest.mark.parametrize(
    "system, expected",
    [
        ({"power_w": [[0.1, 0.1]]}, "system.power_w needs system.subchannel_owner"),
        ({"subchannel_owner": [[0, 1]]}, "system.subchannel_owner needs system.subchannels"),
        ({"subchannels": 3, "subchannel_owner": [[0, 1]]},
         "system.subchannel_owner: row 0 has 2 entries for system.subchannels=3"),
        ({"subchannels": 2, "subchannel_owner": [[0, 2]]},
         r"system.subchannel_owner: row 0 names devices \[2\]; allowed: -1"),
        ({"subchannels": 2, "subchannel_owner": [[0, -2]]}, r"row 0 has \[-2\]; allowed: values >= -1"),
        ({"subchannels": 2, "subchannel_owner": [[0, 1]], "power_w": [[0.1, -1.0]]},
         r"row 0 has \[-1.0\]; allowed: values >= 0"),
        ({"subchannels": 2, "subchannel_owner": [[0, 1]], "power_w": [[0.1]]}, "system.power_w: row 0 has 1 entries"),
    ],
)
def test_bad_allocations_are_named(system, expected):
    with pytest.raises(ConfigError, match=expected):
        _config(**system)


def test_the_clock_uses_the_planned_owners_and_powers():
    owners, power = [[1, 1, 0, -1], [0, 1, 0, 1]], [[0.05, 0.1, 0.2, 0.0], [0.1, 0.1, 0.1, 0.1]]
    config = _config(subchannels=4, subchannel_owner=owners, power_w=power, fading="rayleigh")
    clock = Clock(config, TINY_CONFIGS["llama"](), protocol_class(config.protocol).topology(config, [1, 1], 6))
    for r in range(3):  # rows cycle over rounds
        clock.begin_round(r, [0, 1])
        up_gains, _ = clock.round_gains(r, [0, 1])
        expected = clock.channel.rates(up_gains, np.array(owners[r % 2]), np.array(power[r % 2]))
        assert [clock.up_bps[0], clock.up_bps[1]] == pytest.approx(expected.tolist())


def test_power_above_a_devices_maximum_is_named():
    config = _config(subchannels=2, subchannel_owner=[[0, 1]], power_w=[[5.0, 0.1]])
    clock = Clock(config, TINY_CONFIGS["llama"](), protocol_class(config.protocol).topology(config, [1, 1], 6))
    expected = r"system.power_w: device 0 \(phone0\) transmits 5 W in round 0, above its maximum 0.2 W"
    with pytest.raises(ValueError, match=expected):
        clock.begin_round(0, [0, 1])


def test_predicted_message_sizes_are_the_encoded_sizes():
    costs = layer_costs(TINY_CONFIGS["llama"](), ["q_proj", "v_proj"])
    batch, seq = 3, 16
    tokens = {k: torch.randint(0, 9, (batch, seq)) for k in ("attention_mask", "labels")}
    real = Message("activations", "device7", 0, 0, {"hidden": torch.randn(batch, seq, costs.hidden), **tokens})
    assert step_bytes(costs, 7, batch, seq)["activations"] == len(encode(real))
    state = {}
    for layer in range(2):
        for name, (i, o) in {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (32, 16)}.items():
            state[f"model.layers.{layer}.{name}.lora_A.weight"] = torch.randn(4, i)
            state[f"model.layers.{layer}.{name}.lora_B.weight"] = torch.randn(o, 4)
    upload = Message("adapter_upload", "device0", 0, 0, state, {"num_samples": 1000})
    assert adapter_message_bytes(costs, range(2), 4) == len(encode(upload))
