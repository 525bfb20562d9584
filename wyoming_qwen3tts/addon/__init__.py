"""Home Assistant add-on glue: options to command line, Supervisor discovery, health check."""
