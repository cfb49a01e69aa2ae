package sluicetest

import "testing"

func TestParseMetrics(t *testing.T) {
	text := `# HELP sluice_records_in_total Input records processed.
# TYPE sluice_records_in_total counter
sluice_records_in_total{task="0"} 12
sluice_records_in_total{task="1"} 30
sluice_tasks_owned 2
odd_labels{a="x,y",b="q\"uote"} 1.5e+01 1700000000000
`
	m, err := ParseMetrics([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Sum("sluice_records_in_total"); got != 42 {
		t.Errorf("sum of records in = %v, want 42", got)
	}
	if got := m.By("sluice_records_in_total", "task"); got["0"] != 12 || got["1"] != 30 || len(got) != 2 {
		t.Errorf("by task = %v", got)
	}
	if got := m.Sum("sluice_tasks_owned"); got != 2 {
		t.Errorf("tasks owned = %v, want 2", got)
	}
	if got := m.By("odd_labels", "b"); got[`q"uote`] != 15 {
		t.Errorf("escaped label value: %v", got)
	}
	if got := m.Sum("missing"); got != 0 {
		t.Errorf("missing metric = %v, want 0", got)
	}
	for _, bad := range []string{"novalue", `m{a="x} 1`, `m{a=x} 1`, "m{} notanumber"} {
		if _, err := ParseMetrics([]byte(bad)); err == nil {
			t.Errorf("ParseMetrics(%q) succeeded, want an error", bad)
		}
	}
}

func TestImageName(t *testing.T) {
	for in, want := range map[string]string{"processor": "processor", "My_Job": "my_job", "..": "app", "a b/c": "a-b-c"} {
		if got := imageName(in); got != want {
			t.Errorf("imageName(%q) = %q, want %q", in, got, want)
		}
	}
}
