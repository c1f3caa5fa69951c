"""Load and validate cax.json into frozen dataclasses.

``model`` holds the dataclasses, ``checks`` the rules of every key and of the links between
sites, ``tsm`` the rules of a site's tape-client section, and ``load`` reads the file, chooses
this machine's site and the runs DB.  Everything else imports from here.
"""

from __future__ import annotations

from cax.config.load import choose_site, guess_site, load_config, load_sites
from cax.config.model import LOOPBACK, Config, Processing, Site, Sites, short_hostname

__all__ = ["LOOPBACK", "Config", "Processing", "Site", "Sites", "choose_site", "guess_site",
           "load_config", "load_sites", "short_hostname"]
