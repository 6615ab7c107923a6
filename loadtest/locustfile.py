"""Plain Locust from a checkout (distributed runs): the users and load shapes are in serve/locustfile.py,
which ships with the package (`klein loadtest` runs it); this file re-exports them.

    locust -f loadtest/locustfile.py --host http://HOST:8000 [-u 16 -r 4 -t 5m | KLEIN_SHAPE=ramp]

Needs only locust (and pillow) installed: the checkout's root is put on sys.path for `serve`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.locustfile import *  # noqa: E402, F403  (Locust collects the User and shape classes by name)
