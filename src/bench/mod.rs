//! Benchmark harness: scenarios, measurement, report (markdown + SVG).
