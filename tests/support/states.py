"""ALFWorld-like observations for the request builders of the server, soak and load tests."""

from __future__ import annotations

STATES = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1.",
    "You arrive at cabinet 1. The cabinet 1 is closed.",
    "You open the cabinet 1. In it, you see a soapbar 1 and a spraybottle 2.",
    "You arrive at countertop 1. On the countertop 1, you see a apple 2 and a mug 1.",
    "You pick up the mug 1 from the countertop 1.",
    "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing.",
)
