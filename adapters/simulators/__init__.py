"""Simulated legacy systems for the demo and the tests.

NOT production code: nothing under ``gateway/``, ``systems/`` or ``adapters/`` (outside this
package) imports it; only the command line's embedded default (``gateway serve`` with no
configuration, ``gateway demo``) loads it, lazily. Each simulator follows the fixed contract
in ``../shared/legacy/README.md`` exactly, because the real systems will be pointed at the
gateway in their place.
"""
