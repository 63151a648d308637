module github.com/peftd/peftd

go 1.26.8

require github.com/ardanlabs/jinja v1.8.0 // indirect
