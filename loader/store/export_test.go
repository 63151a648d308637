package store

// EventsFor exposes eventsFor to the tests.
var EventsFor = eventsFor
