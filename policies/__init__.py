"""When a reboot may happen: strategies, maintenance windows, cluster locks."""
