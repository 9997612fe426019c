"""The chunked zarr store and what keeps it safe: crash-safe local writes (``durable``), object
storage (``objectstore``), locks (``locking``, ``leaselock``, ``writing``), provenance checks
(``provenance``), integrity checks and repair (``verify``) and summaries (``info``).
"""
