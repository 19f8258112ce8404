"""gristmill server kit: config, server bootstrap, health, metrics, auth, errors, logs."""
