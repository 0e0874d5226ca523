// The few lines every C++ test binary of tests/cpp/ shares: CHECK, CHECK_THROWS, a table of named
// tests and a main loop that runs them (optionally filtered by a substring of the name) and ends
// with the line "N passed, M failed" that run_sanitizers.sh reads; and Fault, the countdown that test
// backends use to fail chosen calls. Each binary includes it once.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

namespace vse_test {

inline std::atomic<long> g_passed{0};
inline std::atomic<long> g_failed{0};

inline void report(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", file, line, what.c_str());
  }
}

struct Test {
  const char* name;
  void (*fn)();
};

// Runs the tests of `tests` whose name contains argv[1] (all when absent); exit status 1 on a failure.
template <size_t N>
int run_tests(const Test (&tests)[N], int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  for (const Test& t : tests) {
    if (filter && !std::strstr(t.name, filter)) continue;
    std::printf("[ RUN  ] %s\n", t.name);
    std::fflush(stdout);
    const long failed_before = g_failed;
    try {
      t.fn();
    } catch (const std::exception& e) {
      report(false, __FILE__, __LINE__, std::string(t.name) + " threw: " + e.what());
    } catch (...) {
      report(false, __FILE__, __LINE__, std::string(t.name) + " threw a non-std exception");
    }
    std::printf("[ %s ] %s\n", g_failed == failed_before ? " OK " : "FAIL", t.name);
    std::fflush(stdout);
  }
  std::printf("%ld passed, %ld failed\n", g_passed.load(), g_failed.load());
  return g_failed == 0 ? 0 : 1;
}

// An injected fault for a test backend: a countdown, n >= 0 fails the (n+1)-th call from now, once.
class Fault {
 public:
  void arm(int calls_before_failure) { countdown_ = calls_before_failure; }
  void disarm() { countdown_ = -1; }
  bool fire() {
    int c = countdown_.load();
    while (c >= 0)
      if (countdown_.compare_exchange_weak(c, c - 1)) return c == 0;
    return false;
  }

 private:
  std::atomic<int> countdown_{-1};
};

}  // namespace vse_test

#define CHECK(cond) ::vse_test::report(static_cast<bool>(cond), __FILE__, __LINE__, #cond)

// Checks that `expr` throws exactly `Type` (or a subclass); any other outcome is a failure.
#define CHECK_THROWS(expr, Type)                                                                  \
  do {                                                                                            \
    bool vse_thrown_ = false;                                                                     \
    std::string vse_other_;                                                                       \
    try {                                                                                         \
      (void)(expr);                                                                               \
    } catch (const Type&) {                                                                       \
      vse_thrown_ = true;                                                                         \
    } catch (const std::exception& e) {                                                           \
      vse_other_ = std::string(" (threw another exception: ") + e.what() + ")";                  \
    } catch (...) {                                                                               \
      vse_other_ = " (threw a non-std exception)";                                                \
    }                                                                                             \
    ::vse_test::report(vse_thrown_, __FILE__, __LINE__,                                           \
                       std::string(#expr " throws " #Type) + vse_other_);                         \
  } while (0)
