// SPDX-License-Identifier: GPL-2.0
/*
 * swapnbd_nothrottle: the "vanilla" arm's half in mm/ for a stock kernel.
 *
 * Since 3.6, try_to_free_pages() calls throttle_direct_reclaim(), which parks
 * a direct reclaimer on pgdat->pfmemalloc_wait while the free pages of the
 * node are below half the min watermarks (and counts pgscan_direct_throttle).
 * Loading this livepatch replaces that function with one that never throttles,
 * which is the kernel's behaviour before the 2012 swap-over-NBD series. Not
 * loading it leaves the kernel as shipped: the choice is made at module-load
 * time on the very binaries the patched arm runs. Unloading is not supported;
 * the guest is thrown away after the run.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/mmzone.h>
#include <linux/module.h>
#include <linux/nodemask.h>

static bool swapnbd_throttle_direct_reclaim(gfp_t gfp_mask, struct zonelist *zonelist,
					    nodemask_t *nodemask)
{
	return false;
}

static struct klp_func swapnbd_funcs[] = {
	{
		.old_name = "throttle_direct_reclaim",
		.new_func = swapnbd_throttle_direct_reclaim,
	},
	{ }
};

static struct klp_object swapnbd_objs[] = {
	{
		/* name == NULL: the function lives in vmlinux */
		.funcs = swapnbd_funcs,
	},
	{ }
};

static struct klp_patch swapnbd_patch = {
	.mod = THIS_MODULE,
	.objs = swapnbd_objs,
};

static int __init swapnbd_nothrottle_init(void)
{
	int ret = klp_enable_patch(&swapnbd_patch);

	if (ret)
		pr_err("swapnbd: livepatch of throttle_direct_reclaim failed: %d\n", ret);
	else
		pr_info("swapnbd: pfmemalloc_throttle=0: throttle_direct_reclaim() never throttles\n");
	return ret;
}

static void __exit swapnbd_nothrottle_exit(void)
{
}

module_init(swapnbd_nothrottle_init);
module_exit(swapnbd_nothrottle_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("swapnbd: turn off the pfmemalloc throttle of direct reclaim (vanilla arm)");
MODULE_INFO(livepatch, "Y");
