// Package bench holds Sluice's end-to-end throughput benchmarks. It has no
// library code: everything is in its _test.go files and runs only under
// `go test -bench`.
//
// BenchmarkPassthrough copies pre-produced 100-byte records through a
// map-only exactly-once job (FromKafka with operators.Raw, an identity Map,
// ToKafka) and, in the same run and on a fresh in-process kfake broker of the
// same shape, through a raw franz-go GroupTransactSession copy loop that
// commits at the same interval: the practical limit of exactly-once copying
// with franz-go. It reports both rates and their ratio per checkpoint
// interval.
//
// BenchmarkTaskFootprint measures what one task costs an instance: Kafka
// clients, TCP connections, goroutines and heap, with the broker's own heap
// excluded.
//
// The command lines and the latest results are in RESULTS.md.
package bench
