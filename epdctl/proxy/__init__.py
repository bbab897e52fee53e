"""The EPD proxy: fans media out to encoders, prefills on P, streams decode from D or PD.

Run it with `epdctl proxy ...` or `python -m epdctl.proxy ...` (the upstream proxy's flags).
Importing this package is cheap; the aiohttp server lives in `epdctl.proxy.server`.
"""
