package loader

import (
	"fmt"

	"github.com/hashicorp/go-memdb"
)

// Table and index names of the residency index.
const (
	tableAdapters = "adapters"

	indexID      = "id"      // unique: Key (id@version)
	indexAdapter = "adapter" // an adapter's versions: ID
	indexSlot    = "slot"    // device slot (-1: none)
	indexTier    = "tier"    // highest tier the version is in
)

// schemaFactories lists one factory per table.
var schemaFactories = []func() *memdb.TableSchema{
	adaptersTableSchema,
}

// stateSchema builds the residency index schema.
func stateSchema() *memdb.DBSchema {
	db := &memdb.DBSchema{Tables: make(map[string]*memdb.TableSchema)}
	for _, f := range schemaFactories {
		t := f()
		if _, dup := db.Tables[t.Name]; dup {
			panic(fmt.Sprintf("loader: duplicate table %q", t.Name))
		}
		db.Tables[t.Name] = t
	}
	return db
}

// adaptersTableSchema: one row per adapter version the Manager knows of
// (the store's current version, and replaced or deleted versions that
// leases still hold).
func adaptersTableSchema() *memdb.TableSchema {
	return &memdb.TableSchema{
		Name: tableAdapters,
		Indexes: map[string]*memdb.IndexSchema{
			indexID: {
				Name:    indexID,
				Unique:  true,
				Indexer: &memdb.StringFieldIndex{Field: "Key"},
			},
			indexAdapter: {
				Name:    indexAdapter,
				Indexer: &memdb.StringFieldIndex{Field: "ID"},
			},
			indexSlot: {
				Name:    indexSlot,
				Indexer: &memdb.IntFieldIndex{Field: "Slot"},
			},
			indexTier: {
				Name:    indexTier,
				Indexer: &memdb.IntFieldIndex{Field: "Tier"},
			},
		},
	}
}
