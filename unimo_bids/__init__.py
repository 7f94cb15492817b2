"""unimo-bids: UniMo motion correction as a BIDS-App."""

import os

# Nothing phones home: nipype's version check is off before nipype is ever imported.
os.environ["NIPYPE_NO_ET"] = "1"

__version__ = "0.1.0"
