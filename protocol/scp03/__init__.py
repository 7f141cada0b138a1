"""SCP03 (GlobalPlatform Card Spec v2.3 Amendment D v1.2), sans-I/O, host and card side.

API summary
-----------
Keys::

    keys = StaticKeys(enc, mac, dek)                    # AES-128/192/256, repr redacted
    keys.check_values()                                 # KCVs (ENC, MAC, DEK)
    keys = diversify_kdf3(master_keys, kdd)             # per-SE keys from TSM master keys

Host, two round trips (random or pseudo-random card challenge)::

    host = HostSession(keys, key_version=0x30, s_mode=8, random=rng)
    iu = host.initialize_update()                       # CommandAPDU 80 50 ...
    auth = host.on_initialize_update_response(resp)     # card cryptogram verified
    ea = auth.external_authenticate(0x33)               # CommandAPDU 84 82 33 00 ...
    auth.unwrap(ea_resp)                                # EA answer must be 9000
    wrapped = auth.wrap(command)                        # CommandAPDU -> CommandAPDU
    plain = auth.unwrap(resp)                           # R-MAC checked, R-ENC removed

Host, one round trip (pseudo-random card challenge; the TSM tracks the SE's counter)::

    s = OfflineHostSession.predict(keys, key_version=0x30, sequence_counter=last_seen + 1,
                                   sd_aid=sd_aid, security_level=0x33, random=rng)
    script = s.script(commands)                         # [IU, EA, wrapped commands...]
    plains = s.unwrap_all(responses)                    # verifies IU (counter, challenge,
                                                        # cryptogram), EA, every R-MAC

Card (security domain)::

    sd = CardSecureChannel(kdd=kdd, sd_aid=sd_aid, sequence_counter=stored)
    resp, pending = sd.initialize_update(cmd, keys, key_version)   # persist sd.sequence_counter
    session = pending.external_authenticate(cmd)        # CardSession, or raises
    plain = session.unwrap_command(cmd)
    protected = session.wrap_response(ResponseAPDU(data, sw))

PUT KEY key blocks::

    data = put_key_data(dek, [enc, mac, dek_new], style=KeyBlockStyle.LENGTH_PREFIXED)
    keys = parse_put_key_data(dek, data)                # card side, every style, KCV checked

Errors (``protocol.errors``): ``SecureChannelError`` and its subclasses
``CryptogramMismatch``, ``MacMismatch``, ``SequenceCounterMismatch`` (transient: resync
the counter from ``.actual``), ``SecureChannelClosed`` (a dead session was used). After
any verification failure the session object refuses further use.
"""

from protocol.errors import (
    CryptogramMismatch,
    MacMismatch,
    SecureChannelClosed,
    SecureChannelError,
    SequenceCounterMismatch,
)
from protocol.scp03._primitives import key_check_value
from protocol.scp03.card import CardAwaitingAuthentication, CardSecureChannel, CardSession
from protocol.scp03.channel import response_is_protected
from protocol.scp03.diversify import MasterKeys, diversify_kdf3
from protocol.scp03.host import AuthenticatedHost, HostSession, OfflineHostSession
from protocol.scp03.keyblock import (
    AES_KEY_TYPE,
    KeyBlockStyle,
    KeyComponent,
    parse_put_key_data,
    put_key_data,
)
from protocol.scp03.keys import (
    S8,
    S16,
    VALID_SECURITY_LEVELS,
    InitializeUpdateResponse,
    SecurityLevel,
    StaticKeys,
    pseudo_random_card_challenge,
    security_level,
)

__all__ = [
    "AES_KEY_TYPE",
    "S16",
    "S8",
    "VALID_SECURITY_LEVELS",
    "AuthenticatedHost",
    "CardAwaitingAuthentication",
    "CardSecureChannel",
    "CardSession",
    "CryptogramMismatch",
    "HostSession",
    "InitializeUpdateResponse",
    "KeyBlockStyle",
    "KeyComponent",
    "MacMismatch",
    "MasterKeys",
    "OfflineHostSession",
    "SecureChannelClosed",
    "SecureChannelError",
    "SecurityLevel",
    "SequenceCounterMismatch",
    "StaticKeys",
    "diversify_kdf3",
    "key_check_value",
    "parse_put_key_data",
    "pseudo_random_card_challenge",
    "put_key_data",
    "response_is_protected",
    "security_level",
]
