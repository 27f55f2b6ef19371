// SPDX-License-Identifier: MIT
// What the Relacy models share: running one test, and main() with the mutation check.
//
// A model (channel_model.cpp, spsc_model.cpp, request_slot_model.cpp) reads
// every memory order its algorithm depends on from an array indexed by
// "site"; the mutation check weakens one site at a time to relaxed (a fence
// to nothing) and demands that some test fails, unless the model lists the
// site as undetectable with a reason.
//
// Command line of every model:
//   (no option)   every test on the real orders
//   --mutants     every test on each weakened site
//   --quick       fewer iterations (either mode)
//   --part K/N    with --mutants: only the sites s with s % N == K - 1 (and
//                 the unmutated run when K is 1), so ctest can spread the
//                 check over both cores
//   --weaken N    every test with site N weakened, printing Relacy's failing
//                 interleavings
#pragma once

#include <relacy/relacy.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ostream>
#include <streambuf>

namespace model_driver {

// Discards Relacy's output in the mutation check's quiet runs.
struct null_buffer : std::streambuf {
  int overflow(int c) override { return c; }
};

// Runs one test: random scheduling for a number of iterations, or a search
// bounded by context switches; prints its name and verdict unless quiet.
// A model's runner derives from it and adds run_all() (the number failed).
struct test_runner {
  bool quiet = false;
  unsigned iterations = 20000;  // per test, random scheduler
  int name_width = 56;
  null_buffer nb;
  std::ostream null_stream{&nb};

  template <class Test>
  bool run(const char* name, rl::scheduler_type_e kind, unsigned iterations_or_bound) {
    rl::test_params p;
    if (kind == rl::sched_bound) {
      p.search_type = rl::sched_bound;
      p.context_bound = iterations_or_bound;
    } else {
      p.search_type = rl::sched_random;
      p.iteration_count = static_cast<rl::iteration_t>(iterations_or_bound);
    }
    if (quiet) {
      p.output_stream = &null_stream;
      p.progress_stream = &null_stream;
      p.collect_history = true;  // skip Relacy's replay of a failing run
    }
    const bool ok = rl::simulate<Test>(p);
    if (!quiet) std::printf("%-*s %s\n", name_width, name, ok ? "passed" : "FAILED");
    return ok;
  }
  // Random scheduling for `scale` times the runner's iterations.
  template <class Test>
  bool run(const char* name, unsigned scale = 1) {
    return run<Test>(name, rl::sched_random, iterations * scale);
  }
};

// A model's sites: `order` is what the model reads, `real` the code's orders,
// `undetectable(s)` the reason a weakened site s cannot fail a test, or null.
struct sites {
  int count;
  rl::memory_order* order;
  const rl::memory_order* real;
  const char* const* names;
  const char* (*undetectable)(int);
};

// Iterations per test: the real orders' run, and each mutant's.
struct iterations {
  unsigned full, full_quick, mutant, mutant_quick;
};

// A model's main(): see the file comment.
template <class Runner>
int main(int argc, char** argv, Runner& r, const sites& s, const iterations& its) {
  bool mutants = false;
  bool quick = false;
  int part = 1;
  int parts = 1;
  int weaken = -1;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--mutants") == 0) mutants = true;
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    if (std::strcmp(argv[i], "--part") == 0 && i + 1 < argc &&
        (std::sscanf(argv[++i], "%d/%d", &part, &parts) != 2 || parts < 1 || part < 1 || part > parts)) {
      std::printf("--part takes K/N with 1 <= K <= N\n");
      return 2;
    }
    if (std::strcmp(argv[i], "--weaken") == 0 && i + 1 < argc) weaken = std::atoi(argv[++i]);
  }
  const auto reset = [&] {
    for (int k = 0; k < s.count; ++k) s.order[k] = s.real[k];
  };
  reset();
  if (weaken >= 0 && weaken < s.count) {
    // One mutant, verbosely: Relacy prints the failing interleaving.
    s.order[weaken] = rl::mo_relaxed;
    std::printf("weakened: %s\n", s.names[weaken]);
  }

  if (!mutants) {
    r.iterations = quick ? its.full_quick : its.full;
    const int failed = r.run_all();
    std::printf("%s: %d test(s) failed\n", failed ? "FAILED" : "ok", failed);
    return failed ? 1 : 0;
  }

  // Mutation check: weaken one site at a time; some test must fail, unless
  // the site is listed as undetectable.
  r.quiet = true;
  r.iterations = quick ? its.mutant_quick : its.mutant;
  if (part == 1 && r.run_all() != 0) {
    std::printf("FAILED: the unmutated model fails; mutants mean nothing\n");
    return 1;
  }
  if (parts > 1) std::printf("part %d/%d: the sites s with s %% %d == %d\n", part, parts, parts, part - 1);
  int survived = 0;
  for (int k = part - 1; k < s.count; k += parts) {
    reset();
    s.order[k] = rl::mo_relaxed;
    const int failed = r.run_all();
    const char* reason = s.undetectable(k);
    if (failed) {
      std::printf("mutant %-52s: caught by %d test(s)%s\n", s.names[k], failed,
                  reason ? " (listed as undetectable: update the list)" : "");
    } else if (reason) {
      std::printf("mutant %-52s: not distinguishable by the model: %s\n", s.names[k], reason);
    } else {
      std::printf("mutant %-52s: SURVIVED\n", s.names[k]);
      ++survived;
    }
  }
  std::printf("%s: %d unexpected survivor(s)\n", survived ? "FAILED" : "ok", survived);
  return survived ? 1 : 0;
}

}  // namespace model_driver
