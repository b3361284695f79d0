"""Evaluation protocols beyond the CoOp few-shot sweep, each run by `clipadapt bench --protocol`.

- ``base2novel``: CoCoOp's base-to-novel generalisation (train on base classes, report base,
  novel and their harmonic mean);
- ``streetscapes``: one classifier per Global StreetScapes attribute task, full supervision.

Import the module you need (``from clipadapt.protocols.base2novel import ...``); nothing is
imported here so that one protocol's dependencies never load with another's.
"""
