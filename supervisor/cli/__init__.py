"""Command-line tools (pack, verify, twin-patch): import no runtime or server unless they load one."""
