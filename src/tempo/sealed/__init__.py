"""Data and models at rest: what leaves the enclave (or the owner's machine) leaves sealed.

``stream`` is the file format (chunked AES-256-GCM under keys derived from the owner's data key);
``bundle`` seals a dataset folder and a run's configuration into one file and opens it again.
Both the owner's tools (``tempo seal`` / ``tempo unseal``) and the enclave use them; a worker never does.
"""
