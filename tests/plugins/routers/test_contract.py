"""rapid's router contract over every registered router (builtins and installed third parties): a
new router is covered by being registered. The tests live in rapid.builtin.contract, which router
packages import into their own test suites."""

from rapid.builtin.contract import *  # noqa: F401,F403
