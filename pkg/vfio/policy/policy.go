// Package policy says which of a node's GPUs are for VMs: it parses the
// value an administrator declares (all, none, a count, or a list of GPUs by
// index, PCI address, model or NUMA node) and chooses the GPUs it means on a
// node, keeping whole NUMA nodes and PCIe switches together where a count
// leaves the choice open, and never choosing away a GPU a VM holds while
// another one would do.
package policy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// ErrInvalid means a policy value cannot be parsed.
var ErrInvalid = errors.New("invalid GPU policy")

// Kind is the form of a policy.
type Kind int

// Forms of a policy.
const (
	All   Kind = iota // every GPU
	None              // no GPU
	Count             // so many GPUs, chosen by topology
	List              // the GPUs the items name
)

// Policy is a parsed policy value.
type Policy struct {
	Kind  Kind
	Count int    // Count: how many
	Items []Item // List: what names the GPUs
}

// ItemKind is what an Item names GPUs by.
type ItemKind int

// What an Item names GPUs by.
const (
	ByIndex   ItemKind = iota // gpu<N>: the N-th GPU in PCI address order, as nvidia-smi numbers them
	ByAddress                 // a PCI address
	ByNUMA                    // numa<N>: every GPU on NUMA node N
	ByModel                   // a model as in the resource name (GA102GL_A10), any case
)

// Item is one entry of a List policy.
type Item struct {
	Kind  ItemKind
	Index int    // ByIndex, ByNUMA
	Value string // ByAddress: canonical address; ByModel: upper case
	Text  string // as written, for messages
}

// Parse reads a policy value: "all", "none", a count ("4"), or a comma
// separated list of "gpu<N>", PCI addresses ("0000:18:00.0", "18:00.0"),
// "numa<N>" and model names ("GA102GL_A10": letters and digits, both, so
// that a misspelt word is an error rather than a model no GPU has). Case and
// blanks around items do not matter. Errors wrap ErrInvalid and quote the
// value.
func Parse(value string) (Policy, error) {
	v := strings.TrimSpace(value)
	fail := func(format string, args ...any) (Policy, error) {
		return Policy{}, fmt.Errorf("%w %q: %s", ErrInvalid, value, fmt.Sprintf(format, args...))
	}
	switch strings.ToLower(v) {
	case "":
		return fail("empty; want all, none, a count, or a list of gpu<N>, PCI addresses, numa<N> or models")
	case "all":
		return Policy{Kind: All}, nil
	case "none":
		return Policy{Kind: None}, nil
	}
	if isDigits(v) {
		n, err := strconv.Atoi(v)
		if err != nil {
			return fail("count out of range")
		}
		if n == 0 {
			return Policy{Kind: None}, nil
		}
		return Policy{Kind: Count, Count: n}, nil
	}
	p := Policy{Kind: List}
	seen := map[Item]bool{}
	for text := range strings.SplitSeq(v, ",") {
		text = strings.TrimSpace(text)
		it, err := parseItem(text)
		if err != nil {
			return fail("%s", err)
		}
		key := it
		key.Text = ""
		if !seen[key] {
			seen[key] = true
			p.Items = append(p.Items, it)
		}
	}
	return p, nil
}

func parseItem(text string) (Item, error) {
	lower := strings.ToLower(text)
	switch {
	case text == "":
		return Item{}, errors.New("an empty item")
	case isDigits(text):
		return Item{}, fmt.Errorf("item %q: a bare number is a count and stands alone; name the GPU with that index gpu%s", text, text)
	case strings.HasPrefix(lower, "gpu") && isDigits(text[3:]):
		n, err := strconv.Atoi(text[3:])
		if err != nil {
			return Item{}, fmt.Errorf("item %q: index out of range", text)
		}
		return Item{Kind: ByIndex, Index: n, Text: text}, nil
	case strings.HasPrefix(lower, "numa") && isDigits(text[4:]):
		n, err := strconv.Atoi(text[4:])
		if err != nil {
			return Item{}, fmt.Errorf("item %q: NUMA node out of range", text)
		}
		return Item{Kind: ByNUMA, Index: n, Text: text}, nil
	case strings.Contains(text, ":"):
		addr, err := vfio.ParseAddress(text)
		if err != nil {
			return Item{}, fmt.Errorf("item %q: %w", text, err)
		}
		return Item{Kind: ByAddress, Value: addr, Text: text}, nil
	case vfio.ValidResourceName(text) && strings.ContainsAny(text, "0123456789"):
		// A resource name: GA102GL_A10, or pgpu-3ffe for a GPU pci.ids
		// does not know.
		return Item{Kind: ByModel, Value: strings.ToUpper(text), Text: text}, nil
	}
	return Item{}, fmt.Errorf("item %q is no gpu<N>, PCI address, numa<N> or model name (as in its resource name: GA102GL_A10, pgpu-3ffe)", text)
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// String gives the policy in the form Parse reads.
func (p Policy) String() string {
	switch p.Kind {
	case All:
		return "all"
	case None:
		return "none"
	case Count:
		return strconv.Itoa(p.Count)
	}
	items := make([]string, len(p.Items))
	for i, it := range p.Items {
		switch it.Kind {
		case ByIndex:
			items[i] = fmt.Sprintf("gpu%d", it.Index)
		case ByNUMA:
			items[i] = fmt.Sprintf("numa%d", it.Index)
		default:
			items[i] = it.Value
		}
	}
	return strings.Join(items, ",")
}
