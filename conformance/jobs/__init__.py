"""A run as a whole: the run loop and the property search composed for one device or several.

- ``job`` — one device's share: load the backend, run the goldens, then the property search;
- ``devices`` — ``--devices``: one worker process per device, one merged result;
- ``golden_run`` — what ``rlk-conform run`` does, as one library function;
- ``check`` — what ``rlk-conform check`` does, as one library function.
"""
