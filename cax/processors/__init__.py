"""Processors: what turns a raw run into processed data.

The processor is configuration (a site's ``processing.command``, an argument list with
placeholders); ``command`` fills it in.  ``reference`` is a small real processor shipped with
cax so the demo and the tests run the whole path.
"""
