"""The mirror decision as an Envoy dynamic module, written in C and built here.

``decision.c`` is the decision (pure, as extproc/core), ``config.c`` reads its JSON
configuration (with ``json.c``), ``mirror_sampler.c`` is the Envoy HTTP-filter glue
(``passthrough.c`` the hooks Envoy requires that it has no use for) and ``abi.h`` the part of Envoy's dynamic-module ABI it uses;
``build.py`` compiles them with the system C compiler, ``support.py`` knows which
Envoy versions load them. The configuration it reads comes from extproc/envoy/module.py.
"""
