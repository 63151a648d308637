package store

// EventsFor exposes eventsFor to the tests.
var EventsFor = eventsFor

// SetListedHook sets List's hook between the folder's read and its
// adapters' (nil: none) for the tests.
func SetListedHook(f func(root string)) { listedHook = f }
