"""Collections: documents stored with their windows' base vectors (the source of truth) and searched through
indexes derived from them.

- ``base``: the two interfaces, ``CollectionStore`` (persistence) and ``CollectionIndex`` (search), and the types
  they exchange.
- ``sqlite``: the embedded store, one SQLite file per collection.
- ``postgres``: the shared store (``--store postgresql://...``), PostgreSQL with pgvector, which searches itself
  (dense, lexical, filters in SQL), so every replica sees every write at once. Imported on demand (its driver
  is the ``postgres`` extra).
- ``faiss_index``: in-memory dense search with FAISS (exact or HNSW), derived from a store.
- ``collection``: one collection's store and indexes kept consistent; re-indexing onto another base.
- ``manager``: every collection of a home, a data directory or a database (create, delete, damaged and mismatched ones).
- ``names``: the naming rule collections, adapters and datasets share.
"""

from embedlift.service.collections.base import (
    Changes,
    CollectionConfig,
    CollectionIndex,
    CollectionStore,
    Filter,
    Metadata,
    NewDocument,
)
from embedlift.service.collections.collection import Collection, reindex
from embedlift.service.collections.faiss_index import FaissIndex
from embedlift.service.collections.manager import CollectionManager
from embedlift.service.collections.names import check_name, valid_name
from embedlift.service.collections.sqlite import STORE_FILE, SQLiteStore

__all__ = [
    "STORE_FILE", "Changes", "Collection", "CollectionConfig", "CollectionIndex", "CollectionManager", "CollectionStore",
    "FaissIndex", "Filter", "Metadata", "NewDocument", "SQLiteStore", "check_name", "reindex", "valid_name",
]
