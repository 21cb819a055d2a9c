/*
 * Refuses a miscompiled libwasmtime: grows a module's memory directly and
 * from inside a host call (the way wasm-nginx-module reaches a filter's
 * allocator), and checks that memory.size and wasmtime_memory_data_size see
 * the growth. wasmtime-runtime 0.38 built with today's rustc at full
 * optimisation fails this: LLVM drops its VM-context stores, and filters then
 * trap on bodies of a few hundred bytes.
 */
#include <stdio.h>
#include <string.h>
#include <wasm.h>
#include <wasmtime.h>

static const char *WAT =
    "(module (import \"env\" \"reenter\" (func $reenter))"
    " (memory (export \"memory\") 17)"
    " (func (export \"grow\") (param i32) (result i32) (memory.grow (local.get 0)))"
    " (func (export \"size_after_host_call\") (result i32) (call $reenter) (memory.size)))";

static wasmtime_context_t *context;
static wasmtime_instance_t instance;

static int call(const char *name, int32_t arg, int nargs, int32_t *result) {
    wasmtime_extern_t f;
    wasmtime_val_t param = {.kind = WASMTIME_I32, .of.i32 = arg}, res;
    wasm_trap_t *trap = NULL;
    if (!wasmtime_instance_export_get(context, &instance, name, strlen(name), &f)) return -1;
    wasmtime_error_t *e = wasmtime_func_call(context, &f.of.func, &param, nargs, &res, 1, &trap);
    if (e != NULL || trap != NULL) return -1;
    *result = res.of.i32;
    return 0;
}

/* The host function re-enters the module and grows its memory by 3 pages. */
static wasm_trap_t *reenter(void *env, wasmtime_caller_t *caller, const wasmtime_val_t *args,
                            size_t nargs, wasmtime_val_t *results, size_t nresults) {
    int32_t previous;
    (void) env; (void) caller; (void) args; (void) nargs; (void) results; (void) nresults;
    call("grow", 3, 1, &previous);
    return NULL;
}

int main(void) {
    wasm_engine_t *engine = wasm_engine_new();
    wasm_byte_vec_t binary;
    wasmtime_module_t *module;
    wasm_trap_t *trap = NULL;
    if (wasmtime_wat2wasm(WAT, strlen(WAT), &binary) != NULL
        || wasmtime_module_new(engine, (uint8_t *) binary.data, binary.size, &module) != NULL) {
        fprintf(stderr, "memory_grow_check: cannot compile the test module\n");
        return 2;
    }
    wasmtime_store_t *store = wasmtime_store_new(engine, NULL, NULL);
    context = wasmtime_store_context(store);
    wasmtime_linker_t *linker = wasmtime_linker_new(engine);
    wasm_valtype_vec_t none;
    wasm_valtype_vec_new_empty(&none);
    wasm_valtype_vec_t none2;
    wasm_valtype_vec_new_empty(&none2);
    wasm_functype_t *type = wasm_functype_new(&none, &none2);
    wasmtime_linker_define_func(linker, "env", 3, "reenter", 7, type, reenter, NULL, NULL);
    if (wasmtime_linker_instantiate(linker, context, module, &instance, &trap) != NULL || trap != NULL) {
        fprintf(stderr, "memory_grow_check: cannot instantiate the test module\n");
        return 2;
    }
    wasmtime_extern_t mem;
    wasmtime_instance_export_get(context, &instance, "memory", 6, &mem);

    int32_t previous, pages;
    if (call("grow", 2, 1, &previous) != 0 || previous != 17) return 2;
    size_t direct = wasmtime_memory_data_size(context, &mem.of.memory);
    if (call("size_after_host_call", 0, 0, &pages) != 0) return 2;
    size_t nested = wasmtime_memory_data_size(context, &mem.of.memory);
    if (direct != 19 * 65536 || pages != 22 || nested != 22 * 65536) {
        fprintf(stderr, "memory_grow_check: memory.grow is not seen (pages after grow(2): %zu, "
                "after a nested grow(3): memory.size %d, data size %zu pages; expected 19, 22, 22): "
                "this libwasmtime is miscompiled\n", direct / 65536, pages, nested / 65536);
        return 1;
    }
    printf("memory_grow_check: memory.grow seen by wasm and by the host (17 -> 19 -> 22 pages)\n");
    return 0;
}
