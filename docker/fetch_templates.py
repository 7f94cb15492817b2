"""Pre-fetch the TemplateFlow files unimo-bids reads into $TEMPLATEFLOW_HOME (Docker build).

Then checks that unimo-bids finds them, so that an image that would need the network at run
time fails to build instead.
"""

from templateflow.api import get

from unimo_bids.interfaces.template import DEFAULT_TEMPLATE, find_template_mask

get(DEFAULT_TEMPLATE, resolution=2, desc="brain", suffix="mask")
get(DEFAULT_TEMPLATE, resolution=2, desc=None, suffix="T1w")
found = find_template_mask(DEFAULT_TEMPLATE)
assert found["image"] is not None, f"{DEFAULT_TEMPLATE}: T1w image not fetched"
print(f"TemplateFlow: {found['mask']}, {found['image']}")
