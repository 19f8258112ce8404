"""gristmill annotate service: the annotation log, its schemas, review and releases."""
