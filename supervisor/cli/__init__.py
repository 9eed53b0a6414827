"""Command-line tools (pack, verify, twin-patch, rollout): import no runtime or server unless they load one."""
