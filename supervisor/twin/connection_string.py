"""Checking an IoT Hub module connection string before the SDK sees it.

The SDK refuses a malformed string with a ValueError from deep inside ``create_from_connection_string``;
raised in the twin service, that was a crash, a restart a few seconds later and the same crash, for
ever, each with a traceback. Checked here first, the twin stays off with one line saying what is wrong.
The messages name keys and positions, never a value: the string holds the device's key.
"""

from __future__ import annotations

import base64
import binascii

from supervisor.typed_input import nearest

__all__ = ["check_module_connection_string"]

# What the SDK's parser accepts (azure.iot.device.common.auth.connection_string._valid_keys).
_KEYS = ("HostName", "DeviceId", "ModuleId", "SharedAccessKey", "SharedAccessKeyName", "SharedAccessSignature",
         "GatewayHostName", "x509")
_REQUIRED = ("HostName", "DeviceId", "ModuleId", "SharedAccessKey")
_FORM = "HostName=<hub>.azure-devices.net;DeviceId=<device>;ModuleId=<module>;SharedAccessKey=<base64 key>"


def check_module_connection_string(text: str) -> None:
    """Raise ValueError (one line, no secret) unless ``text`` is a module connection string with a
    shared access key, as ``IoTHubModuleClient.create_from_connection_string`` needs."""
    parts = [p for p in text.strip().split(";") if p.strip()]
    if not parts:
        raise ValueError(f"is empty; expected {_FORM}")
    pairs: dict[str, str] = {}
    for index, part in enumerate(parts, 1):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"is malformed: part {index} of {len(parts)} is not Key=value; expected {_FORM}")
        if key not in _KEYS:
            hint = nearest(key, _KEYS) if len(key) <= 40 else None
            shown = f"{key!r}" if len(key) <= 40 else f"in part {index}"
            raise ValueError(f"has an unknown key {shown}" + (f"; did you mean {hint!r}?" if hint else
                                                                f"; expected {_FORM}"))
        if key in pairs:
            raise ValueError(f"names {key} twice")
        pairs[key] = value.strip()
    if "x509" in pairs:
        raise ValueError("uses x509: this module authenticates with a SharedAccessKey (or runs under IoT Edge)")
    missing = [k for k in _REQUIRED if not pairs.get(k)]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}; expected {_FORM}")
    try:
        base64.b64decode(pairs["SharedAccessKey"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("has a SharedAccessKey that is not base64 (copy it whole from the module's identity)") \
            from None
