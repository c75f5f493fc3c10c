"""Secure aggregation (Bonawitz et al. 2017, the SecAgg+ variant's choices of Bell et al. 2020), sans I/O.

The server learns only the weighted sum of the sites' updates (and the sums of
their weights and Dice), never one site's update::

    shamir.py    Shamir sharing of 32-byte secrets over GF(2^521 - 1)
    masking.py   fixed point in Z/2^64, AES-256-CTR masks, the payload's layout
    keys.py      per-round X25519 keys signed with the site certificate's key, share encryption (AES-GCM)
    rules.py     SecureSettings: threshold, weighting, clip bound, the ring's scale
    site.py      SiteSecureRound: one round at a site
    server.py    SecureRound: one round at the server

The sessions (:mod:`~fedseg.federation.protocol.session`) and the round machine
(:mod:`~fedseg.federation.protocol.rounds`) drive them; nothing here opens a
socket or a file.
"""

from fedseg.federation.protocol.secagg.keys import Credentials, SecAggError
from fedseg.federation.protocol.secagg.rules import SecureSettings
from fedseg.federation.protocol.secagg.server import SecureRound
from fedseg.federation.protocol.secagg.site import SiteSecureRound

__all__ = ["Credentials", "SecAggError", "SecureRound", "SecureSettings", "SiteSecureRound"]
