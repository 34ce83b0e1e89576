package vfio

import (
	"fmt"
	"regexp"
	"strings"
)

// addressPattern accepts "dddd:bb:dd.f" and the short "bb:dd.f" that lspci prints.
var addressPattern = regexp.MustCompile(`^(?:([0-9a-f]{4,8}):)?([0-9a-f]{2}):([01][0-9a-f])\.([0-7])$`)

// ParseAddress returns the canonical sysfs form ("0000:65:00.0") of a PCI
// address given in full or in lspci's short form ("65:00.0"). Hex digits may
// be upper or lower case.
func ParseAddress(s string) (string, error) {
	m := addressPattern.FindStringSubmatch(strings.ToLower(strings.TrimSpace(s)))
	if m == nil {
		return "", fmt.Errorf("%w: %q (want domain:bus:device.function, e.g. 0000:65:00.0)", ErrInvalidAddress, s)
	}
	domain := m[1]
	if domain == "" {
		domain = "0000"
	}
	return fmt.Sprintf("%s:%s:%s.%s", domain, m[2], m[3], m[4]), nil
}

// slot is the address without its function: the functions of one card share it.
func slot(address string) string {
	if i := strings.LastIndexByte(address, '.'); i > 0 {
		return address[:i]
	}
	return address
}
