"""Haboob appliance: everything that runs inside the image.

Theory of operation: a site is compiled once, at build time, into an
immutable content store of prebuilt, pre-segmented HTTP responses
(`appliance.content`); a sans-IO HTTP layer picks the response for each
request (`appliance.http`); a specialized user-space TCP/IP stack sends it
from the store, patching only per-connection fields (`appliance.stack`).
This package uses only the standard library: it runs inside the image.
"""
